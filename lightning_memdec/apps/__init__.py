"""End-to-end programs built from the layers below: the quickstart, the shipped bases' pretraining, the server."""
