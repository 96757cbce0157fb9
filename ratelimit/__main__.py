from ratelimit.server import main

main()
