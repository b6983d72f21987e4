"""A task's logged model in MLflow: the task's image on the deployed backbone, as an MLflow pyfunc model.

One call, from the project directory (this module is the model's loader, and the project's mlflow.db is
MLflow's default store there; elsewhere set MLFLOW_TRACKING_URI to it):

    import mlflow
    model = mlflow.pyfunc.load_model("models:/xbar-chip@chip")  # what the chip serves now; or "models:/<model id>"
    classes = model.predict(images)  # uint8 images N x C x H x W, as the task's dataset gives them -> class ids

The model's folder holds `task.pt` (the task's image: masks, spare-PE weights, head, BN), `levels.pt` (the
deployed backbone's weight levels) and `params.yaml` (the model and crossbar the image was learned for);
workflow/tracking.py writes it (`log_task_model`). Loading rebuilds the model as the no-forgetting gate
evaluates it (xbar.methods.load_task_model): its predictions are the task's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILES = ("task.pt", "levels.pt", "params.yaml")


class TaskImage:
    """A learned task rebuilt on the backbone; `predict` gives class ids."""

    def __init__(self, folder: Path) -> None:
        import torch

        from workflow.io import load_torch
        from xbar.methods import load_task_model
        from xbar.params import load_params

        params = load_params(folder / "params.yaml")
        task, levels = load_torch(folder / "task.pt"), load_torch(folder / "levels.pt")
        self.net = load_task_model(task, levels, params).net.to("cpu").eval()
        self._torch = torch

    def predict(self, images, params: dict | None = None) -> np.ndarray:  # noqa: ANN001 (array-like)
        """Class ids of uint8 images [N, C, H, W] (numpy or torch)."""
        from xbar.training import as_input

        torch = self._torch
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        with torch.no_grad():
            return self.net(as_input(x.to(torch.uint8))).argmax(1).cpu().numpy()


def _load_pyfunc(data_path: str) -> TaskImage:
    """MLflow's pyfunc loader hook (MLmodel: loader_module workflow.model, data: the folder of FILES)."""
    return TaskImage(Path(data_path))
