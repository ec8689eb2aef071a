"""A run as the driver sees it: its directory (kd_ray.run.directory), the control the workers
poll (kd_ray.run.control: data cursor, stop flag) and the console a user follows
(kd_ray.run.console: progress board, lines, summary table)."""
