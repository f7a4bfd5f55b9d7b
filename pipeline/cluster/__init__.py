"""Cluster operations: the Ray Jobs client (submit, follow, stop) and manifest rendering
(KubeRay RayJob/RayCronJob, CronJob, RayCluster, `ray up` config)."""
