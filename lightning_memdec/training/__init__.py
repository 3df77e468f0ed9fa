"""Training the Memory Decoder: DataModule, LightningModule, callbacks, fit, vocabulary transfer."""
