"""Models-from-code entry point: MLflow runs this file to build the registered model's pyfunc object.

Logged by :func:`pipelines.mlflow_model.log_pyfunc_model`; at load time ``pipelines.mlflow_model`` is the copy
shipped in the model's ``code/`` directory.
"""

from mlflow.models import set_model

from pipelines.mlflow_model import DiffusionPyfunc

set_model(DiffusionPyfunc())
