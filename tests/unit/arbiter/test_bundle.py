"""Loading, versioning and refusing policy bundles."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import cedarpy
import pytest

from execguard.arbiter import PolicyBundle, bundle_version, demo_bundle_path
from execguard.protocol.errors import BundleInvalid

from .conftest import SMALL_SCHEMA, SMALL_SURFACES, demo_files, write_bundle

PERMIT_ALL = '@id("run-all")\n@reason("ALWAYS")\npermit (principal, action, resource);\n'


def refused(files: dict[str, bytes]) -> BundleInvalid:
    with pytest.raises(BundleInvalid) as info:
        PolicyBundle.from_files(files)
    return info.value


def small_files(**extra: str) -> dict[str, bytes]:
    files = {
        "schema.cedarschema": SMALL_SCHEMA,
        "surfaces.toml": SMALL_SURFACES,
        "policies/main.cedar": PERMIT_ALL,
        **{key: value for key, value in extra.items()},
    }
    return {path: text.encode() for path, text in files.items()}


def test_demo_bundle_loads_with_every_file(demo_bundle: PolicyBundle) -> None:
    assert set(demo_bundle.files) == {
        "README.md", "schema.cedarschema", "surfaces.toml",
        "policies/comms.cedar", "policies/data.cedar", "policies/defaults.cedar",
        "policies/deploy.cedar", "policies/infra.cedar", "policies/payments.cedar",
        "policies/sanctions.cedar", "tests/comms.toml", "tests/data.toml",
        "tests/defaults.toml", "tests/deploy.toml", "tests/infra.toml", "tests/payments.toml",
    }
    assert demo_bundle_path().joinpath("surfaces.toml").is_file()
    assert len({info.id for info in demo_bundle.policies}) == len(demo_bundle.policies) == 20


def test_version_recomputed_by_hand(demo_bundle: PolicyBundle) -> None:
    root = demo_bundle_path()
    digests = {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in root.rglob("*") if path.is_file()
    }
    # RFC 8785 for an object of ASCII string keys and values: sorted keys, no spaces.
    canonical = json.dumps(digests, sort_keys=True, separators=(",", ":")).encode()
    assert demo_bundle.version == hashlib.sha256(canonical).hexdigest()
    assert len(demo_bundle.version) == 64 and demo_bundle.version == demo_bundle.version.lower()


def test_from_files_and_from_directory_agree(demo_bundle: PolicyBundle) -> None:
    assert PolicyBundle.from_files(demo_files()).version == demo_bundle.version


def test_every_byte_counts_including_the_readme() -> None:
    files = demo_files()
    files["README.md"] += b"\n"
    assert PolicyBundle.from_files(files).version != bundle_version(demo_files())


def test_hidden_files_are_ignored_and_not_versioned(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", {"main.cedar": PERMIT_ALL})
    before = PolicyBundle.from_directory(root).version
    (root / ".DS_Store").write_bytes(b"\x00junk")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "policies" / ".draft.cedar").write_text("not cedar at all")
    bundle = PolicyBundle.from_directory(root)
    assert bundle.version == before
    assert ".DS_Store" not in bundle.files


def test_generated_schema_has_one_action_per_surface(demo_bundle: PolicyBundle) -> None:
    schema = cedarpy.Schema.from_str(demo_bundle.schema_text)
    rendered = str(schema)
    for surface in demo_bundle.registry.names():
        assert f'action "{surface}" appliesTo' in rendered
    assert '"beneficiary_account"?: __cedar::String' in demo_bundle.schema_text
    assert '"amount": __cedar::decimal' in demo_bundle.schema_text
    assert '"risk_score"?: __cedar::Long' in demo_bundle.schema_text


def test_policy_info_names_file_line_and_annotations(demo_bundle: PolicyBundle) -> None:
    info = {p.id: p for p in demo_bundle.policies}
    high = info["payment-high-value"]
    assert (high.file, high.effect, high.reason, high.escalate) == (
        "policies/payments.cedar", "forbid", "HIGH_VALUE_PAYMENT", True)
    lines = demo_bundle.files["policies/payments.cedar"].decode().splitlines()
    assert high.line is not None and '@id("payment-high-value")' in lines[high.line - 1]


@pytest.mark.parametrize(("extra", "named"), [
    ({"notes.txt": "hi"}, "notes.txt"),
    ({"policies/sub/x.cedar": PERMIT_ALL}, "policies/sub/x.cedar"),
    ({"policies/readme.txt": "x"}, "policies/readme.txt"),
    ({"../escape.cedar": PERMIT_ALL}, "../escape.cedar"),
])
def test_other_files_are_refused_by_name(extra: dict[str, str], named: str) -> None:
    error = refused(small_files(**extra))
    assert error.file == named
    assert named in str(error)


@pytest.mark.parametrize("missing", ["schema.cedarschema", "surfaces.toml"])
def test_missing_required_file(missing: str) -> None:
    files = small_files()
    del files[missing]
    assert refused(files).file == missing


def test_bundle_without_policies() -> None:
    files = small_files()
    del files["policies/main.cedar"]
    assert "no .cedar file" in str(refused(files))


def test_non_utf8_policy_is_refused() -> None:
    files = small_files()
    files["policies/main.cedar"] = b"// ok\n\xff\xfe"
    error = refused(files)
    assert (error.file, error.line) == ("policies/main.cedar", 2)


def test_a_symlinked_directory_is_refused_not_silently_skipped(tmp_path: Path) -> None:
    # os.walk does not enter a linked directory: its cases would silently not be loaded.
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    shutil.move(bundle / "tests", tmp_path / "shared-tests")
    (bundle / "tests").symlink_to(tmp_path / "shared-tests")
    with pytest.raises(BundleInvalid) as info:
        PolicyBundle.from_directory(bundle)
    assert info.value.file == "tests" and "symbolic link to a directory" in str(info.value)


def test_a_fifo_is_refused_instead_of_blocking(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    fifo = bundle / "tests" / "pipe.toml"
    os.mkfifo(fifo)  # reading it waits for a writer forever
    raised: list[BaseException] = []

    def load() -> None:
        try:
            PolicyBundle.from_directory(bundle)
        except BaseException as exc:  # handed to the test thread
            raised.append(exc)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(timeout=10)
    if loader.is_alive():
        with fifo.open("wb"):  # release the blocked reader before failing
            pass
        pytest.fail("loading a bundle holding a FIFO blocked")
    assert isinstance(raised[0], BundleInvalid)
    assert (raised[0].file, "is not a regular file" in str(raised[0])) == (
        "tests/pipe.toml", True)


def test_a_huge_file_is_refused_without_reading_it_whole(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    with (bundle / "tests" / "huge.toml").open("wb") as handle:
        handle.truncate(64 << 20)  # sparse: 64 MiB that take no disk
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self} whole"))
    with pytest.raises(BundleInvalid) as info:
        PolicyBundle.from_directory(bundle)
    assert info.value.file == "tests/huge.toml" and "is larger than" in str(info.value)


@pytest.mark.parametrize(("annotations", "problem", "line"), [
    ('@escalate\n@quorom("2")\n', "unknown annotation @quorom: did you mean @quorum?", 3),
    ('@escalate\n@aprovers("finance")\n', "did you mean @approvers?", 3),
    ('@approvers("finance")\n@quorum("2")\n', "@approvers applies only to a forbid marked", 2),
    ('@escalate\n@quorum("")\n', "@quorum needs a value", 3),
    ('@escalate\n@approvers("")\n', "@approvers needs a value", 3),
])
def test_an_approval_annotation_that_would_be_ignored_is_refused(
        tmp_path: Path, annotations: str, problem: str, line: int) -> None:
    """A two-person rule must never quietly become one: a misspelt @quorom, an @approvers
    on a policy that does not escalate, or an empty value took the defaults (quorum 1,
    group 'approvers')."""
    policy = f'@id("big")\n{annotations}forbid (principal, action, resource);\n'
    root = write_bundle(tmp_path / "b", {"a.cedar": policy})
    with pytest.raises(BundleInvalid, match=re.escape(problem)) as info:
        PolicyBundle.from_directory(root)
    assert (info.value.file, info.value.line, info.value.key) == ("policies/a.cedar", line, "big")
    # The author's own annotations are theirs.
    write_bundle(tmp_path / "own", {"a.cedar": '@id("big")\n@description("why")\n'
                                               '@owner("team-pay")\nforbid (principal, '
                                               'action, resource);\n'})
    assert PolicyBundle.from_directory(tmp_path / "own").policies[0].id == "big"
