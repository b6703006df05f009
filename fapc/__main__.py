from fapc.cli import main

main()
