"""The platform around diffusion_core: config, data (webdataset), train (Ray Train + MLflow), evaluate, serve
(Ray Serve), the stage DAG and the ``diffusion-pipeline`` CLI. Thin adapters: the math lives in diffusion_core."""

__version__ = "0.1.0"
