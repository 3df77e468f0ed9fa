"""Nearest-neighbour search: FAISS and cuVS (GPU) indexes and their plan, exact search by blocked matrix products."""
