"""A classifier's cross-entropy on tensors held in memory: the small Task the engine tests
train (the strategies, resume, divergence). A subclass sets ``x``, ``y`` and ``per_batch`` in its
constructor and builds its model; it may change ``val_batch`` and ``shuffle_seed``."""

from __future__ import annotations

import torch.nn.functional as F

from divekit.data.loader import TensorBatchLoader
from divekit.engine.task import Task


class CrossEntropyTask(Task):
    per_batch = 16
    val_batch = 7  # validation reads the training data again, in batches of this size
    shuffle_seed = 7

    def train_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=self.per_batch, shuffle=True,
                                 seed=self.shuffle_seed)

    def val_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=self.val_batch)

    def training_step(self, model, batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        return loss, {"loss": loss.detach()}

    def validation_step(self, model, batch):
        x, y = batch
        return {"loss": F.cross_entropy(model(x), y, reduction="sum"), "count": len(y)}

    def validation_end(self, sums):
        return {"loss": float(sums["loss"]) / float(sums["count"]), "seen": int(sums["count"])}
