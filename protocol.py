"""What crosses the wire between the ServerApp and a site's ClientApp: one home for the keys.

Both sides import these names; neither spells a key as a string literal. Every
value a site sends is listed here with why it is safe to send (README, "What a
site sends"): only the DP model update and public facts about the run leave a site.

Server -> site (a train message, built by Flower's FedAvg):
  ARRAYS        the global model (public to every site of the federation)
  CONFIG        ConfigRecord with SERVER_ROUND

Site -> server (a train reply):
  ARRAYS        the site's model after DP-SGD (covered by the site's DP guarantee)
  METRICS       MetricRecord with REPLY_METRICS
  SITE          ConfigRecord with LEDGER_HEAD (a commitment to the site's ledger)

With --dp distributed a round is five exchanges, four after the first
(fedsilo.privacy.secagg, Bonawitz et al.'s protocol with a consistency check), all train
messages whose CONFIG names the stage (SECAGG_STAGE) beside SERVER_ROUND:
  advertise-keys  -> SECAGG record: KEY_C, KEY_S (the site's fresh X25519 public keys),
                  SIGNATURE (by its site key, over the keys, run, round and node id), CERT
                  (its certificate from the federation CA: its site name, already known
                  to the server from its authenticated SuperNode key)
  share-keys      NODES, KEYS_C, KEYS_S, SIGNATURES, CERTS (its neighbours' signed keys),
                  THRESHOLD
                  -> SECAGG record: DESTINATIONS, CIPHERTEXTS (Shamir shares of the site's
                  mask secrets, each AES-GCM-encrypted to its neighbour: opaque to the server)
  masked-input    ARRAYS (the global model), SOURCES, CIPHERTEXTS (shares sent to this site),
                  RING_BYTES (the ring the round sums in: 1 to 8 bytes a weight)
                  -> SECAGG record: MASKED (its noisy quantized gradient sum plus masks,
                  RING_BYTES little-endian bytes a weight: uniform noise to anyone
                  without the masks), PARTNERS (the neighbours it
                  masked with: whose shares opened), METRICS (as above, STEPS 1), SITE
  consistency     ACTIVE, DEAD (the server's view: whose masked vectors enter the sum,
                  who dropped after sharing keys)
                  -> SECAGG record: SIGNATURE (the site's signature over that view)
  unmask          NODES, SIGNATURES (the active sites' signatures on their views)
                  -> SECAGG record: NODES, SHARES (its shares of the active sites' self-mask
                  seeds and of the dropped sites' mask keys; never both of one site), and,
                  before the run's last round, the next round's KEY_C, KEY_S, SIGNATURE,
                  CERT (as advertise-keys sends them, signed for that round): a later
                  round asks only the sites whose keys it does not hold, so it is four
                  exchanges, not five
The server learns the sum of the active sites' vectors, nothing about any one of them.

A site's *name* never travels in a message: the server takes it from the identity
Flower authenticated (the node's registered key; in simulation the partition).
"""

from __future__ import annotations

ARRAYS = "arrays"
CONFIG = "config"
SERVER_ROUND = "server-round"

METRICS = "metrics"
NUM_EXAMPLES = "num-examples"  # the site's example count: public, it sets the sample rate
EPSILON = "epsilon"  # this run's cumulative epsilon at DELTA: a function of the public plan
DELTA = "delta"  # the run's target delta (from the run config)
TARGET_EPSILON = "target-epsilon"  # the run's target (from the run config)
NOISE_MULTIPLIER = "noise-multiplier"  # calibrated from the run config and NUM_EXAMPLES only
STEPS = "steps"  # DP-SGD steps this round: local-epochs x round(N / batch-size)
REPLY_METRICS = (NUM_EXAMPLES, EPSILON, DELTA, TARGET_EPSILON, NOISE_MULTIPLIER, STEPS)

SITE = "site"
LEDGER_HEAD = "ledger-head"  # sha256 of the site's last ledger line after this round's spend

# A site that trained but will not send its update (it is not finite) replies with a
# Flower error of this code and a reason; a refusal to train uses REFUSAL_CODE
# (fedsilo.privacy.refusal). Both are outside Flower's own ErrorCode values (0-8).
SITE_FAILURE_CODE = 4101

# Secure aggregation (fedsilo.privacy.secagg): keys of CONFIG and of the SECAGG record.
SECAGG = "secagg"
SECAGG_STAGE = "secagg-stage"
# The stages (SECAGG_STAGE's values), in order; both sides name them only through these.
ADVERTISE_KEYS = "advertise-keys"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
CONSISTENCY = "consistency"
UNMASK = "unmask"
KEY_C = "key-c"
KEY_S = "key-s"
NODES = "nodes"
KEYS_C = "keys-c"
KEYS_S = "keys-s"
THRESHOLD = "threshold"
DESTINATIONS = "destinations"
SOURCES = "sources"
CIPHERTEXTS = "ciphertexts"
RING_BYTES = "ring-bytes"
MASKED = "masked"
ACTIVE = "active"
DEAD = "dead"
SHARES = "shares"
SIGNATURE = "signature"
SIGNATURES = "signatures"
CERT = "cert"
CERTS = "certs"
PARTNERS = "partners"
