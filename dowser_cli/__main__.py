from dowser_cli.cli import main

main()
