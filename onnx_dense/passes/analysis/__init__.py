"""The analysis rules, one module per pass that applies their plans (driver: passes/analyse.py)."""



