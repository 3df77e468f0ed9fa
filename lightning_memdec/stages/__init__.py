"""The offline pipeline's resumable stages: datastore keys/values and sparse kNN targets."""
