"""The controller: fleet metrics in, versioned offloading plans out.

    costmodel   what one window costs a device class under each (cut, level, codec) choice (pure)
    planner     per (device class, model), the table (bandwidth bucket, battery) -> choice (pure)

The I/O around them (Prometheus in, Redis out) wraps these pure parts.
"""
