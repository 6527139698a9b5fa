"""Ray backend: the only package of mendis_ray that imports ray.

- :mod:`.session`  start or join a Ray cluster (an embedded local one by default)
- :mod:`.data`     Parquet shards -> validate -> degrade -> standardize (Ray Data)
- :mod:`.train`    TorchTrainer around the no-Ray loop (:mod:`mendis_ray.train.loop`): the driver
- :mod:`.worker`   what each TorchTrainer worker (DDP rank) runs
- :mod:`.tune`     Ray Tune over learning rate and depth (function trainable, ASHA)
- :mod:`.infer`    batch scoring of catalogs (``map_batches`` on an actor pool);
  :mod:`.catalog_outputs` its ranked tables, gallery and summary (driver side, no Ray)
- :mod:`.serving`  the Ray Serve scoring application; :mod:`.serve_args` its arguments,
  :mod:`.model_queue` its fan-in queue, :mod:`.serve_local` ``mendis serve``
"""
