"""Serving past one process: ``python -m serve`` on Ray Serve, with replicas chosen by the adapter a request names.

:mod:`~serve.cluster.app` binds three deployments from one :class:`~serve.cluster.app.ClusterConfig`:
the :mod:`~serve.cluster.ingress` (the single server's HTTP app, over the replicas), the
:mod:`~serve.cluster.replica` engines, and the :mod:`~serve.cluster.directory` that holds the
catalog of adapters and the replicas' reports. Needs Ray (``pip install .[cluster]``); nothing
outside this package imports it.
"""
