"""A Triton Python-backend model that runs an ONNX file with ONNX Runtime inside the server.

``nanoscout models export-triton --runtime python`` copies this file as ``<model>/1/model.py``
beside ``model.onnx``. It is for Triton builds that have no ONNX Runtime backend: the server
that ships in the ``nvidia-pytriton`` wheel (its only backend is ``python``), which the test
suite runs on the CPU. A production server uses the ``onnxruntime`` (or ``tensorrt``) variant,
which needs no Python at all.

It runs in Triton's Python stub process, with that interpreter's numpy and onnxruntime; it
imports nothing from nanoscout. Requests that arrive together (dynamic batching) and have the
same input shapes are stacked on the batch axis and run as one batch, when the model has one
(``max_batch_size > 0``); others run one by one. The config parameter ``intra_op_threads`` sets
ONNX Runtime's thread count (default 1: parallelism comes from instance groups).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class TritonPythonModel:
    """The model class Triton's Python backend instantiates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load ``model.onnx`` from this version's folder into an ONNX Runtime session."""
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        self.batched = int(config.get("max_batch_size", 0)) > 0
        params = config.get("parameters", {}) or {}
        threads = int((params.get("intra_op_threads") or {}).get("string_value", "1"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; a failing group answers with its error."""
        pb = self._pb
        feeds = [{n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names}
                 for r in requests]
        groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
        for k, feed in enumerate(feeds):
            key = tuple(feed[n].shape[1:] if self.batched else (k, *feed[n].shape)
                        for n in self.input_names)
            groups.setdefault(key, []).append(k)
        responses: list[Any] = [None] * len(requests)
        for members in groups.values():
            try:
                if len(members) == 1:
                    outs = [self.session.run(self.output_names, feeds[members[0]])]
                else:
                    stacked = {n: np.concatenate([feeds[k][n] for k in members])
                               for n in self.input_names}
                    sizes = [feeds[k][self.input_names[0]].shape[0] for k in members]
                    cuts = np.cumsum(sizes)[:-1]
                    whole = self.session.run(self.output_names, stacked)
                    outs = [list(parts) for parts in zip(*(np.split(o, cuts) for o in whole))]
                for k, out in zip(members, outs):
                    responses[k] = pb.InferenceResponse(output_tensors=[
                        pb.Tensor(n, np.ascontiguousarray(v))
                        for n, v in zip(self.output_names, out)])
            except Exception as exc:  # answer the requests; never take the stub down
                for k in members:
                    responses[k] = pb.InferenceResponse(
                        output_tensors=[], error=pb.TritonError(f"onnxruntime: {exc}"))
        return responses

    def finalize(self) -> None:
        """Drop the session."""
        self.session = None
