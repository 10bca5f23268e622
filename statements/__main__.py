from statements.cli import main

main()
