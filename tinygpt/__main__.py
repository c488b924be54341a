from tinygpt.cli import main

main()
