from execguard.cli import main

main()
