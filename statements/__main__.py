from statements.entry import main

main()
