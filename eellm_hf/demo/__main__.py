from .ee_tune import main

main()
