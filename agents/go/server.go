package quiesce

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Server is a served control socket. Shutdown stops it and removes the socket file.
type Server struct {
	agent *Agent
	ln    *net.UnixListener
	path  string
	file  fileID
	owner owner

	mu    sync.Mutex
	conns map[*net.UnixConn]struct{}
	wg    sync.WaitGroup
	quit  chan struct{}
	once  sync.Once
}

type fileID struct{ dev, ino uint64 }

// owner is who may connect: root, the socket file's owner, and with a group-accessible mode
// the file's group. It is fixed at bind.
type owner struct {
	uid, gid    uint32
	groupAccess bool
}

func (o owner) allows(uid, gid uint32) bool {
	return uid == 0 || uid == o.uid || (o.groupAccess && gid == o.gid)
}

func (o owner) describe() string {
	who := "uid 0 (the app's)"
	if o.uid != 0 {
		who = fmt.Sprintf("uid 0 and uid %d (the app's)", o.uid)
	}
	if o.groupAccess {
		who += fmt.Sprintf(" and processes with gid %d", o.gid)
	}
	return who
}

// ServeFromEnv serves the control socket at the path in QUIESCE_CONTROL_SOCKET. It returns a
// nil Server and a nil error when the variable is unset or empty: the app runs without a
// supervisor (see RunLocal and Run).
func (a *Agent) ServeFromEnv() (*Server, error) {
	path := os.Getenv(SocketEnv)
	if path == "" {
		return nil, nil
	}
	return a.Serve(path)
}

// Serve binds the control socket at path and serves it on background goroutines. A stale
// socket file at the path (one nobody accepts on) is replaced; a socket someone listens on, or
// any file that is not a socket, is an error and is left alone. The new file gets the agent's
// socket mode (0600 by default).
func (a *Agent) Serve(path string) (*Server, error) {
	a.freeze()
	a.mu.Lock()
	mode := a.socketMode
	a.mu.Unlock()
	removed, err := removeStale(path)
	if err != nil {
		return nil, err
	}
	if removed {
		a.logf("quiesce: removed a stale socket file at %s", path)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("%s: cannot bind: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	fail := func(err error) (*Server, error) {
		ln.Close()
		_ = os.Remove(path)
		return nil, fmt.Errorf("%s: cannot set mode %o: %w", path, mode, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		return fail(err)
	}
	info, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return fail(errors.New("no stat data"))
	}
	s := &Server{
		agent: a, ln: ln, path: path,
		file:  fileID{uint64(st.Dev), st.Ino},
		owner: owner{st.Uid, st.Gid, mode&0o070 != 0},
		conns: map[*net.UnixConn]struct{}{},
		quit:  make(chan struct{}),
	}
	s.wg.Add(1)
	go s.accept()
	a.logf("quiesce: control socket listening on %s (app %s)", path, a.name)
	return s, nil
}

// removeStale removes the file at path only if it is a socket nobody accepts on, and reports
// whether it removed one.
func removeStale(path string) (bool, error) {
	info, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("%s: cannot check the existing file: %w", path, err)
	}
	if info.Mode()&os.ModeSocket == 0 {
		return false, fmt.Errorf("%s: a file that is not a socket is there; refusing to remove it", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return false, fmt.Errorf("%s: another process is already listening there", path)
	}
	// Refused: nobody listens. Not found: it went away meanwhile. Anything else (a permission
	// error) leaves open whether someone answers, so the file stays.
	if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT) {
		return false, fmt.Errorf("%s: cannot check the existing file: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("%s: cannot remove the stale socket file: %w", path, err)
	}
	return true, nil
}

// Path returns the socket path.
func (s *Server) Path() string { return s.path }

// Closed is the agent's Closed: closed when the app should exit.
func (s *Server) Closed() <-chan struct{} { return s.agent.Closed() }

// Shutdown stops accepting, closes every open connection, waits for their goroutines and
// removes the socket file if it is still the one Serve created. Steps already running carry
// on and are recorded. It is safe to call more than once.
func (s *Server) Shutdown() {
	s.once.Do(func() {
		close(s.quit)
		s.ln.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
		if info, err := os.Lstat(s.path); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok && uint64(st.Dev) == s.file.dev && st.Ino == s.file.ino {
				_ = os.Remove(s.path)
			}
		}
	})
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			select {
			case <-s.quit:
				return
			default:
			}
			// Out of descriptors and the like: back off instead of spinning.
			s.agent.logf("quiesce: control socket accept failed: %v", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		s.mu.Lock()
		select {
		case <-s.quit:
			s.mu.Unlock()
			c.Close()
			return
		default:
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serve(c)
	}
}

// item is one non-blank line read from a connection, or the refusal of an over-long one.
type item struct {
	line    []byte
	refusal *Refusal
}

// conn is one connection's state on its serving goroutine.
type conn struct {
	s     *Server
	c     *net.UnixConn
	id    uint64
	held  bool          // this connection holds the driver slot
	items chan item     // lines, in order; closed after the last one
	gone  chan struct{} // closed once the peer can send no more (after the last item)
	done  chan struct{} // closed when the serving goroutine ends
}

func (s *Server) serve(c *net.UnixConn) {
	a := s.agent
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	if refusal := s.checkPeer(c); refusal != nil {
		a.logf("quiesce: control connection refused: %s", refusal.Message)
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.Write(refusal.render())
		return
	}
	a.mu.Lock()
	a.nextConn++
	cn := &conn{s: s, c: c, id: a.nextConn, items: make(chan item, 8), gone: make(chan struct{}), done: make(chan struct{})}
	a.mu.Unlock()
	defer cn.release()
	go cn.read()
	defer func() {
		// Stop the reader and wait for it, so no goroutine outlives the connection.
		close(cn.done)
		c.Close()
		<-cn.gone
	}()
	for it := range cn.items {
		line, isClose := cn.answer(it)
		if line == nil {
			return // shutting down
		}
		if _, err := c.Write(line); err != nil {
			return
		}
		if isClose {
			// The driver has the reply to close (first or repeated): the app may exit now.
			a.markReplied()
		}
	}
}

func (s *Server) checkPeer(c *net.UnixConn) *Refusal {
	raw, err := c.SyscallConn()
	if err != nil {
		return refuse(CodePeerRefused, "cannot read the peer's credentials (SO_PEERCRED: %v); connect over a local Unix socket", err)
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		credErr = err
	}
	if credErr != nil {
		return refuse(CodePeerRefused, "cannot read the peer's credentials (SO_PEERCRED: %v); connect over a local Unix socket", credErr)
	}
	if s.owner.allows(cred.Uid, cred.Gid) {
		return nil
	}
	pid := "unknown"
	if cred.Pid > 0 {
		pid = strconv.Itoa(int(cred.Pid))
	}
	return refuse(CodePeerRefused, "peer uid %d (gid %d, pid %s) may not use this socket: only %s may; connect as one of them",
		cred.Uid, cred.Gid, pid, s.owner.describe())
}

// read splits the connection's bytes into lines of at most MaxLine bytes. Past the limit it
// stops keeping bytes, skips to the next "\n" and yields one line_too_long refusal, so the
// connection stays usable. Blank lines are dropped. An unterminated last line is still a line.
func (cn *conn) read() {
	defer close(cn.gone)
	defer close(cn.items)
	br := bufio.NewReaderSize(cn.c, MaxLine)
	var buf []byte
	discarded := -1 // bytes of the current over-long line, -1 when not discarding
	emit := func() bool {
		var it item
		switch {
		case discarded >= 0:
			it.refusal = tooLong(discarded)
		case isBlank(buf):
			buf = buf[:0]
			return true
		default:
			it.line = append([]byte(nil), buf...)
		}
		buf, discarded = buf[:0], -1
		select {
		case cn.items <- it:
			return true
		case <-cn.done:
			return false
		}
	}
	for {
		chunk, err := br.ReadSlice('\n')
		newline := len(chunk) > 0 && chunk[len(chunk)-1] == '\n'
		if newline {
			chunk = chunk[:len(chunk)-1]
		}
		switch {
		case discarded >= 0:
			discarded += len(chunk)
		case len(buf)+len(chunk) > MaxLine:
			discarded, buf = len(buf)+len(chunk), buf[:0]
		default:
			buf = append(buf, chunk...)
		}
		if newline {
			if !emit() {
				return
			}
			continue
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			if (discarded >= 0 || len(buf) > 0) && errors.Is(err, io.EOF) {
				emit()
			}
			return
		}
	}
}

func (cn *conn) claimDriver() bool {
	a := cn.s.agent
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.driver != 0 && a.driver != cn.id {
		return false
	}
	a.driver, cn.held = cn.id, true
	return true
}

func (cn *conn) release() {
	if !cn.held {
		return
	}
	a := cn.s.agent
	a.mu.Lock()
	if a.driver == cn.id {
		a.driver = 0
	}
	a.mu.Unlock()
	cn.held = false
}

// answer returns the reply line to one item, and whether it is the reply to close. A nil line
// means the server is shutting down.
func (cn *conn) answer(it item) ([]byte, bool) {
	received := time.Now()
	a := cn.s.agent
	if it.refusal != nil {
		return it.refusal.render(), false
	}
	req, refusal := parseRequest(it.line)
	if refusal != nil {
		return refusal.render(), false
	}
	cmd, refusal := validate(req)
	if refusal != nil {
		return refusal.render(), false
	}
	switch cmd.verb {
	case "hello":
		if cmd.driver && !cn.claimDriver() {
			return refuse(CodeDriverTaken, "another connection is the driver; only one at a time: close it first, or say `hello role=observer` to read").render(), false
		}
		if !cmd.driver {
			cn.release()
		}
		return a.hello(cmd.driver), false
	case "status":
		return a.statusReply(), false
	case "health":
		return a.healthReply(), false
	}
	if !cn.held {
		return refuse(CodeNotDriver, "`%s` is a step verb and this connection is not the driver: send `hello role=driver` first", cmd.step).render(), false
	}
	s, repeated, refusal := a.startStep(cmd.step, received, received.Add(cmd.deadline), cmd.budgets, cmd.traceparents, false)
	if refusal != nil {
		return refusal.render(), false
	}
	// Wait for the step while watching the peer: if it can send no more, free the driver slot
	// at once (unless it pipelined requests still to be answered), so a reconnecting
	// supervisor can claim it. The step goes on either way.
	gone := cn.gone
	for {
		select {
		case <-s.done:
			return render(a.result(s, repeated)), cmd.step == VerbClose
		case <-gone:
			gone = nil
			if len(cn.items) == 0 {
				a.logf("quiesce: driver disconnected during %s; the step continues", cmd.step)
				cn.release()
			}
		case <-cn.s.quit:
			return nil, false
		}
	}
}
