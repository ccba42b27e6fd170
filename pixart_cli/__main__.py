from pixart_cli.cli import main

main()
