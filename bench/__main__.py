"""``make bench`` entry point. The benchmarks themselves are issue 5; until then say so."""

import sys

print("sipis benchmarks: not written yet (see issue 5: registrations held, REGISTER "
      "throughput vs uac_reg, cold restart, INVITE-to-push latency, push cost vs aioapns)",
      file=sys.stderr)
raise SystemExit(2)
