"""Turning a Ray Train worker failure into one line."""

from stages.train.launch import worker_error_line


def test_worker_error_line_keeps_the_cause():
    ray_text = """Training failed due to worker errors:
[Rank 0,1 Error Snippet]:
Traceback (most recent call last):
  File "/x/worker.py", line 244, in train_loop
    engine.step()
RuntimeError: value cannot be converted to type float without overflow
"""
    assert worker_error_line(ray_text) == "RuntimeError: value cannot be converted to type float without overflow"
    ours = ray_text.replace("RuntimeError: value cannot be converted to type float without overflow",
                            "pipeline.errors.VitpipeError: non-finite loss (nan) at step 2")
    assert worker_error_line(ours) == "non-finite loss (nan) at step 2"
    assert worker_error_line("ray.train.WorkerGroupError: boom\nno cause here") == "ray.train.WorkerGroupError: boom no cause here"
