from controller.server import main

main()
