/* The slot assignment of l4lb/maglev.py's build(), compiled.
 *
 * maglev.py's numpy rounds are the reference: this file is the same algorithm
 * operation by operation (same bands, same candidate order, same IEEE double
 * divisions and comparisons, compiled without contraction or fast-math), so the
 * tables are bit-identical; tests/test_maglev.py builds both on many inputs and
 * compares them. Only integer work is done differently (a remainder without a
 * division, candidates kept without a branch), never a double. It exists for speed: a 100-backend table at M = 16381 took
 * ~3 ms through numpy (~25 rounds of array passes and temporaries), and a whole
 * document builds a thousand of them. Everything that is not the loop (hashes,
 * quotas, the clock, the scramble) stays in Python and comes in as arrays.
 *
 * Plain C with no Python API: loaded with ctypes (l4lb/maglevc.py), built by
 * setuptools as an extension module so that pip installs it next to maglev.py.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct cands {
	int64_t *b, *j, *s;
	double *key;
	unsigned char *won;
	size_t n, cap;
};

/* realloc `p` to `count` elements, or leave the function with -1 (the old block
 * stays in `p`, freed by the caller's cleanup). */
#define GROW_OR_FAIL(p, count)                                      \
	do {                                                        \
		void *grown_ = realloc((p), (count) * sizeof *(p)); \
		if (!grown_)                                        \
			return -1;                                  \
		(p) = grown_;                                       \
	} while (0)

/* Room for `more` candidates after the c->n there are. */
static int cands_reserve(struct cands *c, size_t more)
{
	if (c->n + more > c->cap) {
		size_t cap = c->cap ? 2 * c->cap : 4096;
		while (cap < c->n + more)
			cap *= 2;
		GROW_OR_FAIL(c->b, cap);
		GROW_OR_FAIL(c->j, cap);
		GROW_OR_FAIL(c->s, cap);
		GROW_OR_FAIL(c->key, cap);
		GROW_OR_FAIL(c->won, cap);
		c->cap = cap;
	}
	return 0;
}

static int cands_push(struct cands *c, int64_t b, int64_t j, int64_t s)
{
	if (cands_reserve(c, 1))
		return -1;
	c->b[c->n] = b;
	c->j[c->n] = j;
	c->s[c->n] = s;
	c->n++;
	return 0;
}

/* Late rounds: (position, slot) pairs of one backend, sorted by position. */
struct pos_slot {
	int64_t p, s;
};

static int by_pos(const void *a, const void *b)
{
	int64_t x = ((const struct pos_slot *)a)->p, y = ((const struct pos_slot *)b)->p;
	return (x > y) - (x < y);
}

static int64_t mod(int64_t x, int64_t m)
{
	int64_t r = x % m;
	return r < 0 ? r + m : r;
}

/* x mod m for 0 <= x < 2^52, without a 64-bit division (the proposal loop's
 * cost): the quotient from one double multiplication is off by at most one. */
static inline int64_t mod_small(int64_t x, int64_t m, double inv_m)
{
	int64_t r = x - (int64_t)((double)x * inv_m) * m;
	if (r < 0)
		r += m;
	else if (r >= m)
		r -= m;
	return r;
}

/* x^-1 mod m (m prime, 0 < x < m), by extended Euclid: the pow(x, m - 2, m) of maglev.py. */
static int64_t inverse(int64_t x, int64_t m)
{
	int64_t r0 = m, r1 = x, t0 = 0, t1 = 1;
	while (r1) {
		int64_t q = r0 / r1, r = r0 - q * r1, t = t0 - q * t1;
		r0 = r1;
		r1 = r;
		t0 = t1;
		t1 = t;
	}
	return mod(t0, m);
}

/* Fills owner[m] (every slot -1 on entry) with backend indices; need[n] is
 * consumed. Returns 0, -1 when out of memory, -2 if the rounds stall (cannot
 * happen when the quotas sum to m). */
int l4lb_maglev_assign(int64_t m, int64_t n, const double *wf, int64_t *need, const int64_t *offset,
		       const int64_t *skip, const double *clock, const int64_t *pi,
		       const int64_t *pi_inv, int32_t *owner)
{
	int rc = -1;
	int64_t *ptr = calloc(n, sizeof *ptr);
	int64_t *active = malloc(n * sizeof *active);
	int64_t *start = malloc(n * sizeof *start);
	int64_t *end = malloc(n * sizeof *end);
	int64_t *inv_skip = NULL; /* skip^-1 mod m, for walking back (late rounds) */
	unsigned char *is_free = malloc(m);
	double *best_key = malloc(m * sizeof *best_key);
	int64_t *best_b = malloc(m * sizeof *best_b);
	int64_t *free_s = malloc(m * sizeof *free_s);
	struct pos_slot *row = malloc(m * sizeof *row);
	struct cands c = {0};
	if (!ptr || !active || !start || !end || !is_free || !best_key || !best_b || !free_s || !row)
		goto out;
	memset(is_free, 1, m);
	for (int64_t s = 0; s < m; s++) {
		best_key[s] = INFINITY;
		best_b[s] = n;
	}
	double k0 = 0.0, inv_m = 1.0 / (double)m;
	int64_t nfree = m;
	while (nfree) {
		int64_t na = 0;
		for (int64_t i = 0; i < n; i++)
			if (need[i] > 0)
				active[na++] = i;
		/* Band: about m candidates; the globally next candidate always included. */
		int64_t first = 0;
		double first_key = 0.0, width = 0.0;
		for (int64_t a = 0; a < na; a++) {
			int64_t i = active[a];
			start[a] = ptr[i];
			double nk = clock[start[a]] / wf[i];
			if (a == 0 || nk < first_key) {
				first_key = nk;
				first = a;
			}
			width += wf[i] * (double)(m - start[a]); /* exact integers: any order sums alike */
		}
		double k1 = k0 + (double)m / width;
		if (first_key > k1)
			k1 = first_key;
		int64_t total = 0;
		for (int64_t a = 0; a < na; a++) {
			double v = k1 * wf[active[a]];
			int64_t lo = 0, hi = m; /* searchsorted(clock, v, side="left") */
			while (lo < hi) {
				int64_t mid = lo + (hi - lo) / 2;
				if (clock[mid] < v)
					lo = mid + 1;
				else
					hi = mid;
			}
			if (lo < start[a])
				lo = start[a];
			if (lo > m)
				lo = m;
			end[a] = lo;
			if (a == first && end[a] < start[a] + 1)
				end[a] = start[a] + 1;
			total += end[a] - start[a];
		}
		if (total == 0) {
			rc = -2;
			goto out;
		}
		c.n = 0;
		if (2 * nfree * na < total) {
			/* Late rounds: from the free slots back to each walk's position. */
			if (!inv_skip) {
				inv_skip = malloc(n * sizeof *inv_skip);
				if (!inv_skip)
					goto out;
				for (int64_t i = 0; i < n; i++)
					inv_skip[i] = inverse(skip[i], m);
			}
			int64_t nf = 0;
			for (int64_t s = 0; s < m; s++) { /* branch-free: free slots are scattered */
				free_s[nf] = s;
				nf += is_free[s];
			}
			for (int64_t a = 0; a < na; a++) {
				int64_t i = active[a], nr = 0;
				for (int64_t f = 0; f < nf; f++) {
					int64_t d = free_s[f] - offset[i];
					int64_t p = pi_inv[mod_small((d < 0 ? d + m : d) * inv_skip[i], m, inv_m)];
					if (p >= start[a] && p < end[a]) {
						row[nr].p = p;
						row[nr].s = free_s[f];
						nr++;
					}
				}
				qsort(row, nr, sizeof *row, by_pos);
				for (int64_t r = 0; r < nr; r++)
					if (cands_push(&c, i, row[r].p, row[r].s))
						goto out;
			}
		} else {
			if (cands_reserve(&c, (size_t)total))
				goto out;
			for (int64_t a = 0; a < na; a++) {
				int64_t i = active[a], sk = skip[i], off = offset[i];
				size_t k = c.n;
				/* Every candidate written, kept (k advances) only if its slot is
				 * free: no branch to mispredict on a random slot. */
				for (int64_t j = start[a]; j < end[a]; j++) {
					int64_t s = mod_small(pi[j] * sk + off, m, inv_m);
					c.b[k] = i;
					c.j[k] = j;
					c.s[k] = s;
					k += is_free[s];
				}
				c.n = k;
			}
		}
		for (int64_t a = 0; a < na; a++)
			ptr[active[a]] = end[a];
		k0 = k1;
		if (!c.n)
			continue;
		/* Winner per slot: lowest key, then lowest backend index. */
		for (size_t x = 0; x < c.n; x++) {
			c.key[x] = clock[c.j[x]] / wf[c.b[x]];
			if (c.key[x] < best_key[c.s[x]])
				best_key[c.s[x]] = c.key[x];
		}
		for (size_t x = 0; x < c.n; x++)
			if (c.key[x] == best_key[c.s[x]] && c.b[x] < best_b[c.s[x]])
				best_b[c.s[x]] = c.b[x];
		for (size_t x = 0; x < c.n; x++)
			c.won[x] = c.key[x] == best_key[c.s[x]] && best_b[c.s[x]] == c.b[x];
		for (size_t x = 0; x < c.n; x++) {
			best_key[c.s[x]] = INFINITY;
			best_b[c.s[x]] = n;
		}
		/* Each backend keeps its wins in candidate order up to its quota. */
		for (size_t x = 0; x < c.n; x++) {
			if (c.won[x] && need[c.b[x]] > 0) {
				need[c.b[x]]--;
				owner[c.s[x]] = (int32_t)c.b[x];
				is_free[c.s[x]] = 0;
				nfree--;
			}
		}
		/* A slot left free was won by a backend out of quota: its losers rewind to it. */
		for (size_t x = 0; x < c.n; x++) {
			int64_t b = c.b[x];
			if (is_free[c.s[x]] && need[b] > 0) {
				if (c.j[x] < ptr[b])
					ptr[b] = c.j[x];
				double k = clock[c.j[x]] / wf[b];
				if (k < k0)
					k0 = k;
			}
		}
	}
	rc = 0;
out:
	free(ptr);
	free(active);
	free(start);
	free(end);
	free(inv_skip);
	free(is_free);
	free(best_key);
	free(best_b);
	free(free_s);
	free(row);
	free(c.b);
	free(c.j);
	free(c.s);
	free(c.key);
	free(c.won);
	return rc;
}
