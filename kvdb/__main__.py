from kvdb.cli import main

main()
