"""Ray integration: the runtime (embedded or remote), the stage executor, resource mapping and
job submission; cluster specs live in ``cluster/specs``."""
