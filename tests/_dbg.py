import os, signal, threading, time, sys
from pathlib import Path
from tests.fault_cases import launch_fit

if __name__ == "__main__":
    folder = Path("/tmp/sig/run"); folder.mkdir(parents=True, exist_ok=True)
    delay = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    sent = {}

    def signaller():
        mark = folder / "fault_at"
        while not mark.exists():
            time.sleep(0.05)
        time.sleep(delay)
        for rank in (0, 1, 3):
            pid_file = folder / f"rank{rank}.pid"
            if pid_file.exists():
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
                sent[rank] = time.time() - float(mark.read_text())
    threading.Thread(target=signaller, daemon=True).start()
    outcomes = launch_fit("stop", folder, victim=2, timeout=150, fresh=True, wait_timeout=30)
    print("sent", sent)
    for o in outcomes:
        print(o.rank, o.exit_s, o.exitcode, (o.error or "")[:300].replace("\n", " "))
