/* Router calls counted on the CPU in one pass: what probes.recorder.Recorder.record (one call)
 * and probes.batch_count (a flush's staged calls) do with PyTorch ops, as one C function: the
 * extension module _chrono_native (probes/native.py builds and loads it; Python's headers only,
 * no torch headers: the tensors come as data pointers). Same cells, same order of additions:
 *
 *   col  = clamp(index + 1, 0, cap + 1)                       per assignment a = t * k + j
 *   keep = mask[t] (1 without a mask); drop = dropped[a] * keep; keep -= drop
 *   tokens[col] += keep; weight[col] += (double) w[a] * keep; dropped[col] += drop
 *   padding += pad * k (pad: the call's padded tokens, T - sum(mask), a float64 scalar)
 *   logit_cell += sum(logits)   (float32 sum; float64 for float64 logits: ops.sum_dtype)
 *
 * dtype codes: indices 0 int64, 1 int32; floats 0 float32, 1 float64, 2 bfloat16, 3 float16.
 * Every pointer is checked by the caller (CPU, contiguous, numel). One call or a flush's staged
 * calls (probes.staging: no masks, no drops) in one C call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline float bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    float f;
    if (e == 0) {                       /* zero or subnormal: m * 2^-24 */
        f = (float)m * 5.9604644775390625e-08f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (e == 31) {               /* inf, nan */
        u = sign | 0x7f800000u | (m << 13);
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

static inline double weight_at(const void *w, int dt, int64_t a) {
    switch (dt) {
    case 0: return (double)((const float *)w)[a];
    case 1: return ((const double *)w)[a];
    case 2: return (double)bf16(((const uint16_t *)w)[a]);
    default: return (double)f16(((const uint16_t *)w)[a]);
    }
}

/* LANES independent partial sums (one add chain each), so the vectorised loop is not bound by
 * the latency of one chain: a single accumulator measured ~2x slower than torch.sum on
 * [4096, 256] float32 logits. */
#define LANES 32
#define SUM_LOOP(T, CONV)                                                   \
    {                                                                       \
        const T *x = (const T *)lg;                                         \
        int64_t j;                                                          \
        for (j = 0; j < LANES; j++) part[j] = 0;                            \
        for (i = 0; i + LANES <= nl; i += LANES)                            \
            for (j = 0; j < LANES; j++) part[j] += CONV(x[i + j]);          \
        for (; i < nl; i++) part[0] += CONV(x[i]);                          \
        for (j = 0; j < LANES; j++) s += part[j];                           \
    }
#define SAME(v) (v)

static double logit_sum(const void *lg, int dt, int64_t nl) {
    int64_t i = 0;
    if (dt == 1) {
        double part[LANES], s = 0.0;
        SUM_LOOP(double, SAME)
        return s;
    }
    float part[LANES], s = 0.0f;
    if (dt == 0) SUM_LOOP(float, SAME)
    else if (dt == 2) SUM_LOOP(uint16_t, bf16)
    else SUM_LOOP(uint16_t, f16)
    return (double)s;
}

/* Calls described by DESC int64 each in desc (pointers as integers, 0 for none):
 *   0 col0: the call's slot's first cell in a row of tw (tw: the [2, cells] tokens / weight-sum
 *     rows of the recorder, weight row at tw + cells)
 *   1 indices, 2 index code, 3 n (assignments), 4 weights, 5 weight code
 *   6 logits, 7 logits code, 8 nl: nl >= 0 logits of nl elements, summed here; nl < 0 a
 *     precomputed 0-d logit sum (float32 or float64: a staged copy's)
 *   9 dropped (bool [n]), 10 mask (float64 [T], 0 for padding), 11 pad (0-d float64), 12 T
 *  13 dropped row of the slot, 14 logit cell (0: the weight cell of the slot's column 0, where
 *     the staged path keeps logit sums: no weight sum uses that column), 15 padding cell
 */
#define DESC 16

static void count_calls(double *tw, int64_t cells, int64_t cap, int64_t n_calls, const int64_t *desc) {
    int64_t i, a;
    for (i = 0; i < n_calls; i++) {
        const int64_t *d = desc + DESC * i;
        int64_t col0 = d[0], n = d[3], nl = d[8], T = d[12];
        const void *idx = (const void *)(intptr_t)d[1], *w = (const void *)(intptr_t)d[4];
        const void *lg = (const void *)(intptr_t)d[6];
        const uint8_t *dropped = (const uint8_t *)(intptr_t)d[9];
        const double *mask = (const double *)(intptr_t)d[10];
        double *tok = tw + col0, *wsum = tw + cells + col0, *drop_row = (double *)(intptr_t)d[13];
        int idt = (int)d[2], wdt = (int)d[5];
        int64_t k = T > 0 ? n / T : 1;
        if (k < 1) k = 1;
        for (a = 0; a < n; a++) {
            int64_t c = idt == 0 ? ((const int64_t *)idx)[a] : (int64_t)((const int32_t *)idx)[a];
            c = c < -1 ? 0 : (c > cap ? cap + 1 : c + 1);
            double keep = mask ? mask[a / k] : 1.0;
            if (dropped) {
                double drop = dropped[a] ? keep : 0.0;
                drop_row[c] += drop;
                keep -= drop;
            }
            tok[c] += keep;
            if (w) wsum[c] += weight_at(w, wdt, a) * keep;
        }
        if (mask) *(double *)(intptr_t)d[15] += *(const double *)(intptr_t)d[11] * (double)k;
        if (lg) {
            double s = nl >= 0 ? logit_sum(lg, (int)d[7], nl)
                               : (d[7] == 1 ? *(const double *)lg : (double)*(const float *)lg);
            double *cell = d[14] ? (double *)(intptr_t)d[14] : tw + cells + col0;
            *cell += s;
        }
    }
}

/* count(tw, cells, cap, *fields): fields are DESC ints per call (see above), pointers included.
 * Returns None; TypeError / OverflowError / ValueError for arguments that are not that. */
static PyObject *py_count(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t head[3], stack_desc[DESC * 64], *desc = stack_desc;
    Py_ssize_t i, nf = nargs - 3;
    (void)self;
    if (nargs < 3 || nf % DESC != 0) {
        PyErr_SetString(PyExc_ValueError, "count(tw, cells, cap, *fields): 16 fields per call");
        return NULL;
    }
    for (i = 0; i < 3; i++) {
        head[i] = PyLong_AsLongLong(args[i]);
        if (head[i] == -1 && PyErr_Occurred()) return NULL;
    }
    if (nf > DESC * 64) {
        desc = (int64_t *)PyMem_Malloc(sizeof(int64_t) * (size_t)nf);
        if (!desc) return PyErr_NoMemory();
    }
    for (i = 0; i < nf; i++) {
        desc[i] = PyLong_AsLongLong(args[3 + i]);
        if (desc[i] == -1 && PyErr_Occurred()) {
            if (desc != stack_desc) PyMem_Free(desc);
            return NULL;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    count_calls((double *)(intptr_t)head[0], head[1], head[2], nf / DESC, desc);
    Py_END_ALLOW_THREADS
    if (desc != stack_desc) PyMem_Free(desc);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"count", (PyCFunction)(void (*)(void))py_count, METH_FASTCALL, "count(tw, cells, cap, *fields)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chrono_native", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__chrono_native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "DESC", DESC) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
