// The CPU codebook search, two kernels: small D (1..8) here, any D below (search_cpu.py sends
// D > 8 there). Both give, for each row, the index of the lowest score
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
#include <chrono>
#include <cstdlib>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// x in every lane, a plain broadcast (v8f{} + x is 0 + x, an add the compiler must keep: -0 + 0 = +0)
static inline v8f splat8(float x) { return x - v8f{}; }

// The rows to search, read where they lie: row r = (b, p) = (r / P, r % P) of a (B, P, D) strided
// view (NCHW latents: p runs over the pixels at stride 1, d at stride H W), so neither a
// permuted copy nor a centred one is made. A row enters the search as -2 (x - mu): the same two
// roundings as centring it first and scaling it after.
struct Rows {
    const float* x;
    const float* mu;  // the codebook's mean (D,)
    int64_t D, P, batch_stride, pixel_stride, dim_stride;

    const float* row(int64_t r) const { return x + (r / P) * batch_stride + (r % P) * pixel_stride; }
    float scaled(const float* row, int64_t d) const { return -2.0f * (row[d * dim_stride] - mu[d]); }
};

//: Codes per block: the running minimum is kept per block without an index (one vector min per
//: code), and only the winning block of each row is searched again for its first minimum.
constexpr int64_t BLOCK = 64;

//: From this D on, a score sums its even and odd dimensions in two chains of FMAs, added at the
//: end: a chain of D dependent FMAs is the D = 8 kernel's bound (62 to 72 GFLOP/s on one Zen 3
//: core with two chains; unrolling more codes did not help); at D = 4 one chain was faster.
constexpr int TWO_CHAINS = 6;

template <int D>
static float score(const float* q2, const float* c, float norm) {
    // the same operations in the same order as the vector loop (scores)
    float s = norm, t = 0.0f;
    if (D < TWO_CHAINS) {
        for (int d = 0; d < D; d++) s = __builtin_fmaf(q2[d], c[d], s);
        return s;
    }
    for (int d = 0; d + 1 < D; d += 2) {
        s = __builtin_fmaf(q2[d], c[d], s);
        t = __builtin_fmaf(q2[d + 1], c[d + 1], t);
    }
    if (D % 2) s = __builtin_fmaf(q2[D - 1], c[D - 1], s);
    return s + t;
}

template <int D>
static inline v8f scores(const v8f* q, const float* c, float norm) {
    // norm + sum_d q_d c_d for 8 rows: FMAs under -ffp-contract=fast, in score's order
    v8f s = splat8(norm), t = v8f{};
    if (D < TWO_CHAINS) {
        for (int d = 0; d < D; d++) s += q[d] * c[d];
        return s;
    }
    for (int d = 0; d + 1 < D; d += 2) {
        s += q[d] * c[d];
        t += q[d + 1] * c[d + 1];
    }
    if (D % 2) s += q[D - 1] * c[D - 1];
    return s + t;
}

template <int D, int V>
static void block_search(const Rows& in, int64_t rows, int64_t row0, const float* codes, const float* norms,
                         int64_t K, int64_t* out) {
    // V vectors of 8 rows, as -2 (x - mu): lane l of vector v holds row row0 + 8 v + l (0 past the end)
    v8f qv[V][D];
    for (int v = 0; v < V; v++)
        for (int l = 0; l < 8; l++) {
            const int64_t r = row0 + 8 * v + l;
            const float* row = r < rows ? in.row(r) : nullptr;
            for (int d = 0; d < D; d++) qv[v][d][l] = row ? in.scaled(row, d) : 0.0f;
        }
    v8f best[V];
    v8i at[V];  // the block holding each lane's minimum so far
    for (int v = 0; v < V; v++) {
        best[v] = splat8(INFINITY);
        at[v] = v8i{};
    }
    for (int64_t b0 = 0; b0 < K; b0 += BLOCK) {
        const int64_t b1 = b0 + BLOCK < K ? b0 + BLOCK : K;
        // two minima per vector (even and odd codes): a min's latency is longer than its issue
        v8f lo[2][V];
        for (int u = 0; u < 2; u++)
            for (int v = 0; v < V; v++) lo[u][v] = splat8(INFINITY);
        int64_t k = b0;
        for (; k + 1 < b1; k += 2)
            for (int u = 0; u < 2; u++) {
                const float* c = codes + (k + u) * D;
                for (int v = 0; v < V; v++) {
                    const v8f s = scores<D>(qv[v], c, norms[k + u]);
                    lo[u][v] = s < lo[u][v] ? s : lo[u][v];  // one vminps; a NaN score never wins
                }
            }
        for (; k < b1; k++) {
            const float* c = codes + k * D;
            for (int v = 0; v < V; v++) {
                const v8f s = scores<D>(qv[v], c, norms[k]);
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
static void search(const Rows& in, int64_t start, int64_t stop, const float* codes, const float* norms, int64_t K,
                   int64_t* out) {
    // two vectors of rows (16) where the registers allow it: 2 D + 4 of the 16 AVX2 registers
    constexpr int V = D <= 5 ? 2 : 1;
    for (int64_t r = start; r < stop; r += 8 * V) block_search<D, V>(in, stop, r, codes, norms, K, out);
}

extern "C" int vqfast_nearest_small_d(const Rows* rows, int64_t start, int64_t stop, const float* codes,
                                      const float* norms, int64_t K, int64_t* out) {
    if (K >= INT32_MAX) return 2;
    if (rows->P < 1) return 1;
    const Rows& q = *rows;
    switch (rows->D) {
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

// ---------------------------------------------------------------------------------------------
// Any D (search_cpu.py sends D > 8 here): a register-blocked GEMM whose epilogue is the running
// minimum, so no score tile is written to memory and read back. (A GEMM + argmin moves 8 bytes
// per (row, code) pair beside its 2 D flops: FAISS and the GEMM path ran at 45-60% of the FMA
// peak of a 2-core AVX2 EPYC at D = 64 and 256; this kernel at 80-85% on one core.)
//
// A micro-tile is MV vectors of W rows (rows in lanes, as above) by NR codes: MV * NR
// accumulators, each starting at the code's norm and taking one FMA per dimension in order, so
// every (row, code) score is norm + sum_d (-2 q_d) c_d rounded the same way wherever the row
// and the code sit in a tile, on any number of threads. The epilogue keeps each row's least
// score and its first code (strictly less, codes in order: ties go to the lowest index, a NaN
// score never wins, a row whose scores are all NaN gets 0).
//
// Layout: the codebook comes packed (search_cpu.py's pack: each group of NR codes interleaved,
// [d][NR], so a micro-tile reads one contiguous stream); the rows are packed per panel into
// [tile][d][TR]. Cache blocking: a panel of rows (256 KiB) is swept against the codebook in
// blocks of 192 KiB of codes (in L2), the micro-tile's rows in L1.
// Measured on one core of a Zen 3 EPYC (FMA peak 112 GFLOP/s), D = 256: 90-95 GFLOP/s packed,
// 82-85 with the codes read in place (six strided streams); blocks of 96 to 768 codes and
// panels of 128 KiB to 1 MiB within the run-to-run noise (5%).

#ifndef VQFAST_LANES
#ifdef __AVX512F__
#define VQFAST_LANES 16
#else
#define VQFAST_LANES 8
#endif
#endif
constexpr int W = VQFAST_LANES;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

static inline vf splat(float x) { return x - vf{}; }  // as splat8

//: Row vectors and codes per micro-tile: 2 x 6 accumulators + 2 row vectors + 1 broadcast fit
//: AVX2's 16 registers (3 x 4 spilled: 30% slower; 1 x 12: 10% slower); 2 x 12 + 3 fit AVX-512's 32.
constexpr int MV = 2;
constexpr int NR = W == 16 ? 12 : 6;
constexpr int TR = MV * W;                // rows per micro-tile
constexpr int64_t BLOCK_FLOATS = 49152;   // codes per block: 192 KiB of them (L2), a whole micro-tile at least
constexpr int64_t PANEL_FLOATS = 65536;   // packed rows per panel: 256 KiB of them

template <int N>
static inline void micro_tile(const float* qp, const float* cp, const float* norms, int64_t k, int64_t D,
                              vf* best, vi* at) {
    // cp: the N codes k.. packed [d][N]
    vf acc[MV][N];
    for (int j = 0; j < N; j++)
        for (int v = 0; v < MV; v++) acc[v][j] = splat(norms[k + j]);
    for (int64_t d = 0; d < D; d++) {
        vf qv[MV];
        for (int v = 0; v < MV; v++) qv[v] = *(const vf*)(qp + d * TR + v * W);
        for (int j = 0; j < N; j++) {
            const vf b = splat(cp[d * N + j]);
            for (int v = 0; v < MV; v++) acc[v][j] += qv[v] * b;  // FMA under -ffp-contract=fast
        }
    }
    for (int v = 0; v < MV; v++) {
        vf m = best[v];
        vi i = at[v];
        for (int j = 0; j < N; j++) {
            const vi lower = acc[v][j] < m;
            m = lower ? acc[v][j] : m;
            i = lower ? vi{} + (int32_t)(k + j) : i;
        }
        best[v] = m;
        at[v] = i;
    }
}

static int search_any_d(const Rows& in, int64_t start, int64_t stop, const float* packed, const float* norms,
                        int64_t K, int64_t* out) {
    const int64_t D = in.D;
    const int64_t tiles = PANEL_FLOATS / (D * TR) > 1 ? PANEL_FLOATS / (D * TR) : 1;  // per panel
    const int64_t codes = BLOCK_FLOATS / (D * NR) > 1 ? BLOCK_FLOATS / (D * NR) * NR : NR;  // per block
    float* qp = (float*)std::aligned_alloc(64, (size_t)(tiles * TR * D) * sizeof(float));
    vf* best = (vf*)std::aligned_alloc(64, (size_t)(tiles * MV) * sizeof(vf));
    vi* at = (vi*)std::aligned_alloc(64, (size_t)(tiles * MV) * sizeof(vi));
    if (!qp || !best || !at) {
        std::free(qp), std::free(best), std::free(at);
        return 3;
    }
    for (int64_t r0 = start; r0 < stop; r0 += tiles * TR) {
        const int64_t used = (stop - r0 + TR - 1) / TR < tiles ? (stop - r0 + TR - 1) / TR : tiles;
        for (int64_t t = 0; t < used; t++) {
            for (int l = 0; l < TR; l++) {
                const int64_t r = r0 + t * TR + l;
                const float* row = r < stop ? in.row(r) : nullptr;
                for (int64_t d = 0; d < D; d++) qp[(t * D + d) * TR + l] = row ? in.scaled(row, d) : 0.0f;
            }
            for (int v = 0; v < MV; v++) {
                best[t * MV + v] = splat(INFINITY);
                at[t * MV + v] = vi{};
            }
        }
        for (int64_t b0 = 0; b0 < K; b0 += codes) {
            const int64_t b1 = b0 + codes < K ? b0 + codes : K;
            for (int64_t t = 0; t < used; t++) {
                const float* tile = qp + t * D * TR;
                int64_t k = b0;
                for (; k + NR <= b1; k += NR)
                    micro_tile<NR>(tile, packed + k * D, norms, k, D, best + t * MV, at + t * MV);
                for (; k < b1; k++) micro_tile<1>(tile, packed + k * D, norms, k, D, best + t * MV, at + t * MV);
            }
        }
        for (int64_t t = 0; t < used; t++)
            for (int l = 0; l < TR; l++) {
                const int64_t r = r0 + t * TR + l;
                if (r < stop) out[r] = at[t * MV + l / W][l % W];
            }
    }
    std::free(qp), std::free(best), std::free(at);
    return 0;
}

//: Codes per micro-tile, the group size of the packed codebook.
extern "C" int vqfast_codes_per_tile() { return NR; }

extern "C" int vqfast_nearest_any_d(const Rows* rows, int64_t start, int64_t stop, const float* packed,
                                    const float* norms, int64_t K, int64_t* out) {
    if (K >= INT32_MAX) return 2;
    if (rows->D < 1 || rows->P < 1) return 1;
    return search_any_d(*rows, start, stop, packed, norms, K, out);
}

// The FMA peak of one core at this build's vector width, measured (GFLOP/s): 12 independent
// FMA chains for ``iterations`` steps. `vqfast bench` reports the searches' fraction of it
// (/proc/cpuinfo's clock is the nominal one; the cores run above it).
extern "C" double vqfast_fma_gflops(int64_t iterations) {
    vf acc[12];
    for (int j = 0; j < 12; j++) acc[j] = splat(1e-3f * j);
    const vf a = splat(0.999f), b = splat(1e-7f);
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iterations; i++)  // floats: no closed form, the chains stay
        for (int j = 0; j < 12; j++) acc[j] = acc[j] * a + b;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    float sink = 0;
    for (int j = 0; j < 12; j++) sink += acc[j][0];
    return sink == sink ? 12.0 * 2 * W * iterations / seconds / 1e9 : 0.0;
}
