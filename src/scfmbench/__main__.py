from scfmbench.cli import main

main()
