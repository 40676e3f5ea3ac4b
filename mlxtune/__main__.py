from mlxtune.cli.main import main

main()
