"""One module per DVC stage; each reads only its own section of params.yaml."""
