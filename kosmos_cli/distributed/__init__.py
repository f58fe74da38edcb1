"""Several devices: `worker` (page reference -> record, the one path, in any process) and `local` (one
worker process a device of this machine, pages handed out as the workers ask)."""
