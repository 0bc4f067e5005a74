"""The ``vqfast`` command (main) and its subcommands: demo, train, encode / decode of datasets
(tokens, with images, tokenfile, budget, sharding) and bench. The top of the import order."""
