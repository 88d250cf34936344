from qcompiler.cli import main

if __name__ == "__main__":  # not when a worker process (qcompiler.workers) imports it
    raise SystemExit(main())
