"""Backend health checks: a room of its own beside the control core.

    targets   (pure) which probe each (service, backend) gets; one per distinct check
    overlay   (pure) desired services + health facts -> effective services
    machine   (pure) rise/fall and flap damping of one probe's results
    probe     probers on non-blocking sockets: tcp, http(s), udp-dns, tunnel or direct
    scheduler one epoll loop that runs every probe on time
    worker    that loop in a process of its own (no GIL shared with the API)
    store     the last known state of every probe (state_dir/health.db)
    manager   subscribes to the control core, starts and stops probes, and
              hands transitions back through Control.set_health

Health is runtime state: never written into the desired document. It reaches
the datapath only as effective weights, through the control core's one
change path (a down backend is treated like a drained one).
"""
