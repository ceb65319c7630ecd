"""First-party method plugins. Each subpackage registers through the ``spd_host`` entry-point
group exactly like a third-party package; the host never imports these modules directly."""
