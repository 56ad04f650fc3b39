from ddchallenge.cli import main

main()
