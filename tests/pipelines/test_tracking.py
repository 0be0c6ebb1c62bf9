"""find_or_create_run: two drivers starting the same run_name at once end with one MLflow run."""

from __future__ import annotations

import threading

import mlflow

from pipelines.tracking import find_or_create_run


class _RacingClient(mlflow.MlflowClient):
    """A real client whose create_run waits until both callers have searched and found nothing: the worst
    interleaving of two concurrent drivers, made certain."""

    def __init__(self, uri: str, barrier: threading.Barrier) -> None:
        super().__init__(uri)
        self.barrier = barrier

    def create_run(self, *args, **kwargs):
        self.barrier.wait(timeout=60)
        return super().create_run(*args, **kwargs)


def test_two_concurrent_creators_end_with_one_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = mlflow.MlflowClient(uri).create_experiment("race", artifact_location=(tmp_path / "art").as_uri())
    barrier = threading.Barrier(2)
    results: dict[int, tuple[str, bool]] = {}
    errors: list[BaseException] = []

    def driver(i: int) -> None:
        try:
            results[i] = find_or_create_run(exp, "ray_run_name", "same", run_name="same",
                                            client=_RacingClient(uri, barrier))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=driver, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    (id0, created0), (id1, created1) = results[0], results[1]
    assert id0 == id1 and created0 != created1  # one run, created by exactly one of them
    client = mlflow.MlflowClient(uri)
    active = client.search_runs([exp], "tags.ray_run_name = 'same'")
    assert [r.info.run_id for r in active] == [id0]
    deleted = client.search_runs([exp], "tags.ray_run_name = 'same'", run_view_type=mlflow.entities.ViewType.DELETED_ONLY)
    assert len(deleted) == 1 and deleted[0].data.tags["superseded_by"] == id0
    # a later driver finds it and creates nothing
    assert find_or_create_run(exp, "ray_run_name", "same", run_name="same", client=client) == (id0, False)
