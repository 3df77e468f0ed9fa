"""End-to-end programs built from the layers below: the quickstart and the shipped bases' pretraining."""
