"""What the SDK scripts share: fail with a reason, and wait (bounded) for a condition."""
import sys
import time


def fail(why):
    print("FAIL", why, flush=True)
    sys.exit(1)


def wait(cond, what, secs=60):
    """Poll `cond` every 50 ms until it holds; fail after `secs`."""
    end = time.time() + secs
    while not cond():
        if time.time() > end:
            fail("timed out waiting for " + what)
        time.sleep(0.05)
