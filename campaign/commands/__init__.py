"""The commands that are not roles: each opens the database, does one job and exits.

`status`, `report`, `import`, `prune`, `demo` and the controls (`migrate`, `pause`, `resume`,
`cancel`). They may import roles (the demo runs a worker) and shared pieces; no role
imports them.
"""
