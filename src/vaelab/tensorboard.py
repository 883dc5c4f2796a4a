"""`vaelab train --tensorboard`: scalars (the ELBO, its parts, learning rate, β, seconds) and, each epoch, the
sample and reconstruction grids (and a VampPrior's pseudo-inputs), written by torch.utils.tensorboard into
RUN/tensorboard/. TensorBoard is an optional extra: ``pip install 'vaelab[tensorboard]'``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vaelab.errors import UsageError

DIRECTORY = "tensorboard"


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a UsageError that names the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UsageError("--tensorboard needs the TensorBoard package: pip install 'vaelab[tensorboard]' "
                         f"(or pip install tensorboard); {exc}") from exc
    return SummaryWriter


class TensorBoardLog:
    """An epoch observer of the trainer: one event per metric per epoch, and two image grids (three for a VampPrior:
    its first 100 pseudo-inputs uₖ in rows of 10, as the report shows them)."""

    def __init__(self, run_dir: Path, test_images: torch.Tensor):
        self.writer = summary_writer_class()(log_dir=str(Path(run_dir) / DIRECTORY))
        self.digits = test_images[:32].float()

    def __call__(self, model, row: dict) -> None:
        from vaelab.plots import image_grid
        from vaelab.training import CLIP_FIELDS, TIME_FIELDS

        # each column under what it measures, the losses under nats/: with --clip-grad-norm the steps rescaled and the
        # gradient's mean norm are no nats (until 2026-12-06 they were filed as nats/clipped_steps, …)
        groups = {**dict.fromkeys(TIME_FIELDS, "seconds"), "lr": "schedule", "beta": "schedule",
                  **dict.fromkeys(CLIP_FIELDS, "gradient")}
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(f"{groups.get(key, 'nats')}/{key}", value, epoch)
        model.eval()
        with torch.no_grad():
            samples = model.sample(64, torch.Generator(device=self.digits.device).manual_seed(0)).cpu().numpy()
            recon = torch.sigmoid(model.decode_latents(model.posterior_start(self.digits)))
            pseudo = getattr(model.prior, "pseudo_inputs", None)
            grids = [("samples", samples, 8, 8)]
            if pseudo is not None:                   # until 2026-12-06 only the HTML report showed them
                u = pseudo()[:100].cpu().numpy()                                    # (min(K, 100), 784)
                grids.append(("pseudo_inputs", u, -(-len(u) // 10), 10))
        # rows of 8 digits, each over its reconstructions; a run of fewer than 32 test digits leaves cells blank
        rows = -(-len(self.digits) // 8)
        blank = np.zeros((rows * 8 - len(self.digits), 784), dtype=np.float32)
        pairs = np.concatenate([np.concatenate([images.cpu().numpy(), blank]).reshape(rows, 1, 8, 784)
                                for images in (self.digits, recon)], axis=1).reshape(rows * 16, 784)
        for tag, images, grid_rows, cols in (*grids, ("reconstructions", pairs, 2 * rows, 8)):
            grid = 1.0 - image_grid(images, grid_rows, cols)   # white digits on black, as TensorBoard shows them
            self.writer.add_image(tag, grid[None].astype(np.float32), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
