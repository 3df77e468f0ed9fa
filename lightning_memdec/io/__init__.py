"""Files on disk: meta.json and atomic publishing, .npy rows, token corpora, text sources, readers of
datastores and targets, shipped assets and configs, disk and RAM checks. Imports kernels only."""
