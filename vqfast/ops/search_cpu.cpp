// The CPU codebook search for small D (1..8): for each row, the index of the lowest score
// norms[k] - 2 q . c[k] (q and c centred on the codebook's mean, as every vqfast search ranks),
// the first one on ties, 0 for a row whose scores are all NaN (torch.argmin's answer there).
//
// Why a kernel: a GEMM writes every score tile and an argmin reads it back, so at D = 4 the
// search is memory-bound at a few flops per byte. Here 8 or 16 rows live in vector registers
// (GCC vector extensions: 8 fp32 lanes, whatever ISA -march=native gives), each code is
// broadcast once for them, and the running minimum never leaves registers: D FMAs and one min
// per 8 (row, code) pairs. The index is not carried per code (a compare and a select more):
// each row keeps the block of BLOCK codes that holds its minimum, and that block alone is
// scored again at the end to find the first code with the least score.
//
// Built at first use by vqfast/ops/search_cpu.py with the system C++ compiler; plain C ABI,
// called through ctypes on row ranges from several threads (no OpenMP runtime of its own).

#include <cmath>
#include <cstdint>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

//: Codes per block: the running minimum is kept per block without an index (one vector min per
//: code), and only the winning block of each row is searched again for its first minimum.
constexpr int64_t BLOCK = 64;

template <int D>
static float score(const float* q2, const float* c, float norm) {
    // the same operations in the same order as the vector loop: norm, then one FMA per dimension
    float s = norm;
    for (int d = 0; d < D; d++) s = __builtin_fmaf(q2[d], c[d], s);
    return s;
}

template <int D, int V>
static void block_search(const float* q, int64_t rows, int64_t row0, const float* codes, const float* norms,
                         int64_t K, int64_t* out) {
    // V vectors of 8 rows: q as -2 q, lane l of vector v holding row row0 + 8 v + l (0 past the end)
    v8f qv[V][D];
    for (int v = 0; v < V; v++)
        for (int d = 0; d < D; d++)
            for (int l = 0; l < 8; l++) {
                int64_t r = row0 + 8 * v + l;
                qv[v][d][l] = r < rows ? -2.0f * q[r * D + d] : 0.0f;
            }
    v8f best[V];
    v8i at[V];  // the block holding each lane's minimum so far
    for (int v = 0; v < V; v++) {
        best[v] = v8f{} + INFINITY;
        at[v] = v8i{};
    }
    for (int64_t b0 = 0; b0 < K; b0 += BLOCK) {
        const int64_t b1 = b0 + BLOCK < K ? b0 + BLOCK : K;
        // two minima per vector (even and odd codes): a min's latency is longer than its issue
        v8f lo[2][V];
        for (int u = 0; u < 2; u++)
            for (int v = 0; v < V; v++) lo[u][v] = v8f{} + INFINITY;
        int64_t k = b0;
        for (; k + 1 < b1; k += 2)
            for (int u = 0; u < 2; u++) {
                const float* c = codes + (k + u) * D;
                for (int v = 0; v < V; v++) {
                    v8f s = v8f{} + norms[k + u];
                    for (int d = 0; d < D; d++) s += qv[v][d] * c[d];  // FMA under -ffp-contract=fast
                    lo[u][v] = s < lo[u][v] ? s : lo[u][v];  // one vminps; a NaN score never wins
                }
            }
        for (; k < b1; k++) {
            const float* c = codes + k * D;
            for (int v = 0; v < V; v++) {
                v8f s = v8f{} + norms[k];
                for (int d = 0; d < D; d++) s += qv[v][d] * c[d];
                lo[0][v] = s < lo[0][v] ? s : lo[0][v];
            }
        }
        const v8i block = v8i{} + (int32_t)(b0 / BLOCK);
        for (int v = 0; v < V; v++) {
            v8f m = lo[1][v] < lo[0][v] ? lo[1][v] : lo[0][v];
            v8i lower = m < best[v];  // strictly: the earliest block with the minimum stays
            best[v] = lower ? m : best[v];
            at[v] = lower ? block : at[v];
        }
    }
    for (int v = 0; v < V; v++)
        for (int l = 0; l < 8; l++) {
            int64_t r = row0 + 8 * v + l;
            if (r >= rows) continue;
            // the first code of the winning block with the block's least score, recomputed in
            // the same arithmetic (a row whose scores are all NaN keeps block 0 and gets code 0)
            float q2[D];
            for (int d = 0; d < D; d++) q2[d] = qv[v][d][l];
            const int64_t b0 = (int64_t)at[v][l] * BLOCK, b1 = b0 + BLOCK < K ? b0 + BLOCK : K;
            int64_t pick = b0;
            float least = INFINITY;
            for (int64_t k = b0; k < b1; k++) {
                float s = score<D>(q2, codes + k * D, norms[k]);
                if (s < least) {
                    least = s;
                    pick = k;
                }
            }
            out[r] = pick;
        }
}

template <int D>
static void search(const float* q, int64_t start, int64_t stop, const float* codes, const float* norms, int64_t K,
                   int64_t* out) {
    // two vectors of rows (16) where the registers allow it: 2 D + 4 of the 16 AVX2 registers
    constexpr int V = D <= 5 ? 2 : 1;
    for (int64_t r = start; r < stop; r += 8 * V) block_search<D, V>(q, stop, r, codes, norms, K, out);
}

extern "C" int vqfast_nearest_small_d(const float* q, int64_t start, int64_t stop, int64_t D, const float* codes,
                                      const float* norms, int64_t K, int64_t* out) {
    if (K >= INT32_MAX) return 2;
    switch (D) {
        case 1: search<1>(q, start, stop, codes, norms, K, out); return 0;
        case 2: search<2>(q, start, stop, codes, norms, K, out); return 0;
        case 3: search<3>(q, start, stop, codes, norms, K, out); return 0;
        case 4: search<4>(q, start, stop, codes, norms, K, out); return 0;
        case 5: search<5>(q, start, stop, codes, norms, K, out); return 0;
        case 6: search<6>(q, start, stop, codes, norms, K, out); return 0;
        case 7: search<7>(q, start, stop, codes, norms, K, out); return 0;
        case 8: search<8>(q, start, stop, codes, norms, K, out); return 0;
    }
    return 1;
}
