"""kd_ray: Ray-orchestrated, elastic knowledge distillation from one YAML job file."""

__version__ = "0.1.0"
