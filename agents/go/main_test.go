package quiesce

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// peerEnv makes the test binary a peer helper: it connects to the socket named by the
// variable, sends status, prints the one line it gets back and exits.
const peerEnv = "QUIESCE_GO_TEST_PEER"

func TestMain(m *testing.M) {
	if path := os.Getenv(peerEnv); path != "" {
		os.Exit(peerHelper(path))
	}
	code := m.Run()
	if code == 0 {
		code = checkGoroutines()
	}
	os.Exit(code)
}

func peerHelper(path string) int {
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = c.Write([]byte("status\n"))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Print(line)
	return 0
}

// checkGoroutines fails the run when goroutines the tests started are still running a few
// seconds after the last test (a handler cut at its deadline gets that long to return).
func checkGoroutines() int {
	var left []string
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if left = leftGoroutines(); len(left) == 0 {
			return 0
		}
	}
	fmt.Fprintf(os.Stderr, "%d goroutines left behind:\n%s\n", len(left), strings.Join(left, "\n\n"))
	return 1
}

// leftGoroutines lists every goroutine's stack except this one's and the runtime's signal
// loop (started by signal.Notify, it never ends).
func leftGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var left []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "checkGoroutines") || strings.Contains(g, "os/signal.loop") {
			continue
		}
		left = append(left, g)
	}
	return left
}

// hardTimeout ends the whole test binary, with every goroutine's stack, if the test is still
// running after d.
func hardTimeout(t *testing.T, d time.Duration) {
	t.Helper()
	name := t.Name()
	timer := time.AfterFunc(d, func() {
		panic(fmt.Sprintf("%s: still running after %s", name, d))
	})
	t.Cleanup(func() { timer.Stop() })
}

// socketPath is a short socket path in a fresh directory removed after the test.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "qgo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "control.sock")
}

// serve serves a on a fresh socket and shuts it down after the test.
func serve(t *testing.T, a *Agent) (*Server, string) {
	t.Helper()
	path := socketPath(t)
	srv, err := a.Serve(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	return srv, path
}

// client is one connection to the control socket; every read has a deadline.
type client struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, path string) *client {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{t: t, c: c, r: bufio.NewReaderSize(c, 1<<16)}
}

func (c *client) send(s string) {
	c.t.Helper()
	_ = c.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.c.Write([]byte(s)); err != nil {
		c.t.Fatalf("send %q: %v", s, err)
	}
}

func (c *client) line() string {
	c.t.Helper()
	_ = c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("reading a reply: %v (got %q)", err, line)
	}
	return strings.TrimSuffix(line, "\n")
}

// ask sends one request line and returns the reply line.
func (c *client) ask(request string) string {
	c.t.Helper()
	c.send(request + "\n")
	return c.line()
}

// runPeer connects to path as uid and gid from a child process and returns the line it got.
// It needs root; the test binary is copied where that uid can run it.
func runPeer(t *testing.T, path string, uid, gid uint32) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "qgopeer")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "peer")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), peerEnv+"="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}, Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("peer as uid %d: %v", uid, err)
	}
	return strings.TrimSuffix(string(out), "\n")
}

// openUp lets any user reach the socket file (the peer check is what refuses them).
func openUp(t *testing.T, path string) {
	t.Helper()
	if err := os.Chmod(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
}

func needRoot(t *testing.T, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("QUIESCE_ALLOW_SKIP") == "1" {
			t.Skipf("skipped: needs root: %s", why)
		}
		t.Fatalf("needs root: %s (set QUIESCE_ALLOW_SKIP=1 to skip)", why)
	}
}
