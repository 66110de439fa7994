"""Serving BitFit tasks: the bias bank that runs many tasks over one frozen base in mixed batches
(:mod:`~bitfit.serving.bank`, with its task storage in :mod:`~bitfit.serving.store` and its per-row
bias machinery in :mod:`~bitfit.serving.rowbias`), the HTTP service over a bank (routes in
:mod:`~bitfit.serving.app`, request batching in :mod:`~bitfit.serving.batching`, the request guard and
body decoding in :mod:`~bitfit.serving.guard`), and export of one task merged into its base as
TorchScript or ONNX (:mod:`~bitfit.serving.export`). It sits above the artifacts layer and may import
``core``, ``data``, ``fast``, ``methods`` and ``artifacts``; nothing here imports ``training`` or ``cli``.
"""
